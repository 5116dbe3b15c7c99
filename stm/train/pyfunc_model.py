"""The registered model's code, as an MLflow "model from code": ``mlflow.pyfunc.load_model``
runs this file (from the model's own copy of the ``stm`` source) instead of unpickling a Python
object. Nothing else imports it."""

import mlflow.models

from stm.train.registry import STMVideoClassifier

mlflow.models.set_model(STMVideoClassifier())
