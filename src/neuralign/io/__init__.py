"""Checkpoints: one safetensors file whose header records the architecture and metadata.

``save_model(model, "a.safetensors", metadata={...})`` writes one file in one atomic rename;
``load_model("a.safetensors")`` rebuilds the model with no architecture from the caller, and also
reads plain safetensors or PyTorch state dicts (with ``arch=``; pickles only with
``allow_pickle=True``), Hugging Face model directories and the JSON sidecars of older versions.
``read_info`` reads the header only. Loading is strict and refuses NaN/Inf weights.
"""

from neuralign.io.atomic import atomic_write
from neuralign.io.checkpoint import (
    FORMAT,
    read_info,
    read_record,
    read_sidecar,
    save_model,
    save_state_dict,
    sidecar_path,
)
from neuralign.io.formats import PICKLE_SUFFIXES, LazyStateDict, read_header
from neuralign.io.loading import load_into, load_model, load_state_dict

__all__ = [
    "FORMAT", "PICKLE_SUFFIXES", "LazyStateDict", "atomic_write", "load_into", "load_model",
    "load_state_dict", "read_header", "read_info", "read_record", "read_sidecar", "save_model",
    "save_state_dict", "sidecar_path",
]
