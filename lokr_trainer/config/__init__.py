"""The run config (:mod:`.run_config`) and the tools around it.

``python -m lokr_trainer.config from-kohya ...`` converts a kohya sd-scripts
config (:mod:`.kohya`); ``python -m lokr_trainer.config reference`` writes the
configuration reference generated from :func:`schema` (:mod:`.reference`).
"""

from lokr_trainer.config import run_config as _run_config
from lokr_trainer.config.run_config import *  # noqa: F401,F403 - the public names are run_config's __all__

__all__ = list(_run_config.__all__)
