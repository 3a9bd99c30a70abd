"""neuralign: knowledge-preserving fine-tuning and model fusion through neuron alignment."""

from neuralign.errors import NeuralignError

__version__ = "0.1.0"
__all__ = ["NeuralignError", "__version__"]
