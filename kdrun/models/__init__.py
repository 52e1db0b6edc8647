"""Teacher and student models: loading, building, measuring, capturing internals."""

import kdrun.models.bilstm  # noqa: F401  (registers the BiLSTM student with the Auto classes)
