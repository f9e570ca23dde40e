"""The only package that touches DeepSpeed: process setup (``distributed``), the trained-model wrapper
(``engine``: backward/step, collectives, generation mode, the Hugging Face save), what it is built from
(``optim``: AdamW groups, LR schedule, DeepSpeed config), evaluated-only models (``frozen``) and resumable
checkpoints of engines (``state``).

``import chatrlhf.engine`` is cheap: deepspeed is imported inside the functions that need it.
"""

from chatrlhf.engine.distributed import init_distributed, shutdown_distributed
from chatrlhf.engine.engine import Engine, NonFiniteError
from chatrlhf.engine.frozen import FrozenModel
from chatrlhf.engine.optim import lr_factor

__all__ = ["Engine", "FrozenModel", "NonFiniteError", "init_distributed", "lr_factor", "shutdown_distributed"]
