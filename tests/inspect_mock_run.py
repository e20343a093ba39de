"""Run the inspect_ai task end to end (mockllm + the fake judge server), as tests/test_inspect_task.py does, and print
the metrics and per-sample scores quoted in docs/interop.md: `python tests/inspect_mock_run.py`."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai_server import FakeOpenAIServer  # noqa: E402
from inspect_ai import eval as inspect_eval  # noqa: E402
from test_inspect_task import QUESTIONS, _logprob_judge, _mock_model, _yes_no_judge  # noqa: E402

from em_interp.inspect_task import emergent_misalignment  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        questions = Path(tmp) / "questions.yaml"
        questions.write_text(QUESTIONS)
        for mode, responder in (("logprob", _logprob_judge), ("yes_no", _yes_no_judge)):
            with FakeOpenAIServer() as server:
                server.responder = responder
                task = emergent_misalignment(str(questions), judge_model="fake-judge", judge_base_url=server.base_url,
                                             mode=mode)
                [log] = inspect_eval(task, model=_mock_model(), log_dir=str(Path(tmp) / "logs"), display="none")
            print(f"mode={mode} status={log.status} samples={len(log.samples)}")  # noqa: T201
            for score in log.results.scores:
                print("  ", score.name, {k.rsplit("/", 1)[-1]: round(m.value, 4) for k, m in score.metrics.items()})  # noqa: T201
            for sample in log.samples:
                explanation = next(iter(sample.scores.values())).explanation
                print(f"   {sample.id:<11} answer={sample.output.completion[:28]!r:<32} {explanation}")  # noqa: T201


if __name__ == "__main__":
    main()
