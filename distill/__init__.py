"""Student side: data from the teacher cache, losses, trainer, evaluation."""
