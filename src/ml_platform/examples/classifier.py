"""The example ML pipeline that ``mlp demo`` runs.

Make a synthetic classification dataset, split it, propose a hyperparameter grid, train one
model per grid point (``train.map``: the grid is a task's result, so the fan-out is decided
when the run gets there), evaluate each (accuracy and ROC AUC as metrics), pick the best, and
register it as an artifact only if it clears ``min_roc_auc``.
"""

from __future__ import annotations

from typing import Any

from ml_platform.sdk import Skip, context, task, workflow

DEFAULT_GRID: list[dict[str, Any]] = [
    {"model": "logistic_regression", "C": 0.1},
    {"model": "logistic_regression", "C": 10.0},
    {"model": "random_forest", "n_estimators": 50, "max_depth": 4},
    {"model": "random_forest", "n_estimators": 100, "max_depth": None},
]


@task(cache=True)
def make_dataset(n_samples: int, n_features: int, seed: int) -> dict[str, Any]:
    """A synthetic binary classification problem."""
    from sklearn.datasets import make_classification

    features, labels = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=max(2, n_features // 2),
        random_state=seed,
    )
    context().log_metric("n_samples", n_samples)
    return {"X": features, "y": labels}


@task(cache=True)
def split(dataset: dict[str, Any], test_size: float, seed: int) -> dict[str, Any]:
    """Stratified train/test split."""
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(
        dataset["X"], dataset["y"], test_size=test_size, random_state=seed, stratify=dataset["y"]
    )
    return {"X_train": x_train, "X_test": x_test, "y_train": y_train, "y_test": y_test}


@task
def propose_grid(grid: list[dict[str, Any]] | None, n_features: int) -> list[dict[str, Any]]:
    """The grid points to train: the run's ``grid`` or one fitted to the data's width."""
    if grid is not None:
        return grid
    # Deeper forests only pay off with more features: the grid depends on the data.
    depth = 4 if n_features <= 20 else 8
    return [*DEFAULT_GRID[:3], {**DEFAULT_GRID[3], "max_depth": depth}]


@task(cache=True, retries=2)
def train(hyperparameters: dict[str, Any], data: dict[str, Any], seed: int) -> dict[str, Any]:
    """Fit one model of the grid."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    settings = dict(hyperparameters)
    kind = settings.pop("model")
    for name, value in settings.items():
        context().log_param(name, value)
    model: Any
    if kind == "logistic_regression":
        model = LogisticRegression(max_iter=1000, **settings)
    elif kind == "random_forest":
        model = RandomForestClassifier(random_state=seed, n_jobs=1, **settings)
    else:
        raise ValueError(f"unknown model {kind!r}; use logistic_regression or random_forest")
    return {
        "model": model.fit(data["X_train"], data["y_train"]),
        "hyperparameters": hyperparameters,
    }


@task(cache=True)
def evaluate(trained: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Accuracy and ROC AUC on the held-out split, logged as metrics."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    model = trained["model"]
    accuracy = float(accuracy_score(data["y_test"], model.predict(data["X_test"])))
    roc_auc = float(roc_auc_score(data["y_test"], model.predict_proba(data["X_test"])[:, 1]))
    ctx = context()
    for name, value in trained["hyperparameters"].items():
        ctx.log_param(name, value)  # what the comparison names each grid point by
    ctx.log_metric("accuracy", accuracy)
    ctx.log_metric("roc_auc", roc_auc)
    return {"hyperparameters": trained["hyperparameters"], "accuracy": accuracy, "roc_auc": roc_auc}


@task
def pick_best(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid point with the highest ROC AUC."""
    index = max(range(len(scores)), key=lambda i: scores[i]["roc_auc"])
    best = dict(scores[index], index=index)
    context().log_metric("best_roc_auc", best["roc_auc"])
    return best


@task
def register_model(best: dict[str, Any], models: list[dict[str, Any]], min_roc_auc: float) -> str:
    """Save the best model as the run's ``model`` artifact if it is good enough."""
    if best["roc_auc"] < min_roc_auc:
        raise Skip(f"best ROC AUC {best['roc_auc']:.3f} is below the threshold {min_roc_auc}")
    digest = context().save_artifact("model", models[best["index"]]["model"])
    print(f"registered {best['hyperparameters']} with ROC AUC {best['roc_auc']:.4f}")
    return digest


@workflow
def training_pipeline(
    n_samples: int = 2000,
    n_features: int = 20,
    test_size: float = 0.25,
    seed: int = 7,
    grid: list[dict[str, Any]] | None = None,
    min_roc_auc: float = 0.8,
) -> None:
    """Train a classifier over a hyperparameter grid and register the best model."""
    dataset = make_dataset(n_samples, n_features, seed)
    data = split(dataset, test_size, seed)
    points = propose_grid(grid, n_features)
    models = train.map(points, data=data, seed=seed)
    scores = evaluate.map(models, data=data)
    best = pick_best(scores)
    register_model(best, models, min_roc_auc)
