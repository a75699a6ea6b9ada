"""The run config (:mod:`.run_config`) and the tools around it.

``python -m lokr_trainer.config from-kohya ...`` converts a kohya sd-scripts
config (:mod:`.kohya`); ``python -m lokr_trainer.config reference`` writes the
configuration reference generated from :func:`schema` (:mod:`.reference`).
"""

from lokr_trainer.config.run_config import (
    CAPTION_HELP,
    DataConfig,
    DiffusionConfig,
    FieldHelp,
    LOKR_HELP,
    LOKR_RULE_HELP,
    ModelConfig,
    OptimizerConfig,
    RULES,
    Rule,
    RunConfig,
    SampleConfig,
    SchedulerConfig,
    TrainConfig,
    ValidationConfig,
    apply_override,
    load_config,
    run_defining_dict,
    save_config,
    schema,
)

__all__ = [
    "CAPTION_HELP",
    "DataConfig",
    "DiffusionConfig",
    "FieldHelp",
    "LOKR_HELP",
    "LOKR_RULE_HELP",
    "ModelConfig",
    "OptimizerConfig",
    "RULES",
    "Rule",
    "RunConfig",
    "SampleConfig",
    "SchedulerConfig",
    "TrainConfig",
    "ValidationConfig",
    "apply_override",
    "load_config",
    "run_defining_dict",
    "save_config",
    "schema",
]
