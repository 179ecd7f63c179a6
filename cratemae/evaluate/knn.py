"""k-nearest-neighbour classification on frozen features, by cosine similarity.

With unit vectors f_hat = f / |f|, the neighbours of a test feature are the k training features of largest cosine
similarity s_j = f_hat_test . f_hat_j. The vote for class c is

    weighted (DINO, Caron et al. 2021):  V_c = sum_{j in top-k, y_j = c} exp(s_j / T),  T = 0.07
    majority:                            V_c = #{j in top-k : y_j = c}

and the prediction is argmax_c V_c (ties: the smaller class index). k is clipped to the training-set size.
"""

import jax
import jax.numpy as jnp
import numpy as np

VOTES = ('weighted', 'majority')


def _normalize(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train_x, train_y, test_x, num_classes, *, k=20, temperature=0.07, vote='weighted', chunk=1024):
    """Predicted classes (M,) of test_x (M, d) by the k nearest train_x (N, d) under cosine similarity."""
    if vote not in VOTES:
        raise ValueError(f'Unknown kNN vote {vote!r}; choose one of {VOTES}.')
    if k < 1:
        raise ValueError(f'k={k} must be at least 1.')
    bank = jnp.asarray(_normalize(train_x))
    labels = jnp.asarray(np.asarray(train_y, np.int32))
    k = min(int(k), bank.shape[0])

    @jax.jit
    def predict(queries):
        sims, idx = jax.lax.top_k(queries @ bank.T, k)  # (m, k)
        weights = jnp.exp(sims / temperature) if vote == 'weighted' else jnp.ones_like(sims)
        votes = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
        votes = votes.at[jnp.arange(queries.shape[0])[:, None], labels[idx]].add(weights)
        return jnp.argmax(votes, axis=-1)

    test_x = _normalize(test_x)
    return np.concatenate(
        [np.asarray(predict(jnp.asarray(test_x[i : i + chunk]))) for i in range(0, len(test_x), chunk)]
    )


def knn_accuracy(train_x, train_y, test_x, test_y, num_classes, **kwargs) -> float:
    """Top-1 accuracy of ``knn_predict`` on (test_x, test_y)."""
    return float(np.mean(knn_predict(train_x, train_y, test_x, num_classes, **kwargs) == np.asarray(test_y)))
