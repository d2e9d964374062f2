"""Self-describing, verified, atomically written checkpoints, and the import of
the research code's checkpoints."""
from norton.checkpoints.atomic import atomic_save, atomic_write_text
from norton.checkpoints.files import (
    FORMAT,
    load_checkpoint,
    load_model,
    load_state_dict_file,
    load_state_dict_strict,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
    state_dict_of,
)
from norton.checkpoints.research import (
    convert_research_state_dict,
    load_research_checkpoint,
    parse_research_name,
)

__all__ = [
    "FORMAT", "atomic_save", "atomic_write_text", "convert_research_state_dict", "load_checkpoint", "load_model",
    "load_research_checkpoint", "load_state_dict_file", "load_state_dict_strict", "model_from_checkpoint",
    "parse_research_name", "read_checkpoint", "save_checkpoint", "state_dict_of",
]
