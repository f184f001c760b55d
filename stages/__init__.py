"""Built-in stage kinds (installed as ``phi4_engine.stages``), registered like any plugin."""

from __future__ import annotations

from phi4_engine import hookimpl


@hookimpl
def phi4_register_stages(register):
    from phi4_engine.stages.dpo_judge import DpoJudgeSpec, DpoJudgeStage
    from phi4_engine.stages.dpo_pivotal import DpoPivotalSpec, DpoPivotalStage
    from phi4_engine.stages.midtrain import MidtrainSpec, MidtrainStage
    from phi4_engine.stages.pretrain import PretrainSpec, PretrainStage
    from phi4_engine.stages.refusal import RefusalSpec, RefusalStage
    from phi4_engine.stages.sft import SftSpec, SftStage

    register("pretrain", PretrainSpec, PretrainStage)
    register("midtrain", MidtrainSpec, MidtrainStage)
    register("sft", SftSpec, SftStage)
    register("dpo-pivotal", DpoPivotalSpec, DpoPivotalStage)
    register("dpo-judge", DpoJudgeSpec, DpoJudgeStage)
    register("refusal", RefusalSpec, RefusalStage)
