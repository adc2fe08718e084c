"""mriq core: the pure-ML library (preprocessing, data, models, training, evaluation, inference)."""
