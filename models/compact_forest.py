"""A compact evaluator of a fitted ``sklearn.ensemble.IsolationForest`` for one event at a time.

Why this exists
---------------
scikit-learn's ``IsolationForest.score_samples`` pays ~14 ms of fixed cost per call (input
validation, joblib dispatch, one ``tree.apply`` per tree), so a service that scores events one
by one gets ~70 events/s out of it. The forest itself is tiny: 100 trees (the retrain job's
default) of depth <= 8. Here the fitted trees are flattened once into plain arrays and then
*compiled* into a single Python function made of nested ``if x3 <= 0.123:`` tests, one block
per tree, that adds each leaf's path-length contribution to a running sum. Every tree step is
then three bytecodes on local variables, so one event costs roughly (trees x depth) float
comparisons and nothing else: about 25,000-35,000 events/s on one core for 200 trees of 256
samples (twice that for 100), against ~70/s for sklearn on one row. Building and compiling
takes ~0.4 s (done once, at load).

Exactness
---------
The result equals ``IsolationForest.score_samples`` (same sign: lower = more abnormal), because
every step of sklearn's ``_compute_score_samples`` is reproduced:

* inputs are rounded to float32 first (sklearn validates ``X`` with ``dtype=np.float32``) and
  compared against the float64 thresholds with ``<=``;
* a NaN goes where sklearn sends it (``missing_go_to_left`` per node);
* ``max_features < 1.0`` is resolved at flattening time: each tree's local feature index is
  mapped through ``estimators_features_`` to the original column;
* each leaf contributes ``depth + c(n_node_samples) - 1`` (root depth 1), with ``c`` the
  average path length of an unsuccessful BST search, added tree by tree in the same order;
* the sum is normalised by ``n_trees * c(max_samples_)`` and mapped through ``2 ** -(.)``.

The compiled function is rebuilt from the arrays when an instance is unpickled, so artifacts hold
only numpy arrays and ints (no code objects, no sklearn objects).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["CompactForest", "average_path_length"]

_ARRAY_FIELDS = ("feature", "threshold", "left", "right", "missing_left", "leaf_value")

_MAX_CODEGEN_DEPTH = 80
"""CPython's tokenizer refuses more than 100 indentation levels; deeper trees use the loop path."""


def average_path_length(n_samples: np.ndarray | Sequence[float]) -> np.ndarray:
    """Average path length ``c(n)`` of an unsuccessful search in a BST built on ``n`` samples.

    This is the correction added at an isolation-tree leaf that still holds ``n`` training
    samples (the subtree that was not grown). Same formula and the same float operations as
    ``sklearn.ensemble._iforest._average_path_length``, so results match bit for bit.

    Parameters
    ----------
    n_samples
        Number of samples, any shape.

    Returns
    -------
    numpy.ndarray
        ``c(n)``, same shape as the input, float64.
    """
    n = np.asarray(n_samples, dtype=np.float64)
    shape = n.shape
    n = n.reshape((1, -1))
    out = np.zeros(n.shape)
    mask_1 = n <= 1
    mask_2 = n == 2
    rest = ~np.logical_or(mask_1, mask_2)
    out[mask_2] = 1.0
    out[rest] = 2.0 * (np.log(n[rest] - 1.0) + np.euler_gamma) - 2.0 * (n[rest] - 1.0) / n[rest]
    return out.reshape(shape)


class CompactForest:
    """A fitted isolation forest flattened into arrays and compiled for single-row scoring.

    Build it with :meth:`from_sklearn`. All trees share one node numbering: tree ``t`` starts at
    ``roots[t]``; a node is a leaf when ``feature[node] < 0``.

    Parameters
    ----------
    feature
        Column of the original input tested at each node (``-1`` at leaves).
    threshold
        Split threshold; a row goes left when ``x[feature] <= threshold`` (after float32
        rounding).
    left, right
        Global indices of the children (``-1`` at leaves).
    missing_left
        Where a NaN goes at each node (``True`` = left), as sklearn decides.
    leaf_value
        Per-leaf contribution ``depth + c(n_node_samples) - 1`` (0 at internal nodes).
    roots
        Global index of each tree's root, in the forest's estimator order.
    n_features
        Number of input columns the forest was fitted on.
    denominator
        ``n_trees * c(max_samples_)``; 0 only for a forest fitted on a single sample.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.ensemble import IsolationForest
    >>> X = np.random.default_rng(0).normal(size=(300, 3))
    >>> forest = IsolationForest(n_estimators=20, random_state=0).fit(X)
    >>> compact = CompactForest.from_sklearn(forest)
    >>> bool(abs(compact.score_samples_one(X[0]) - forest.score_samples(X[:1])[0]) < 1e-12)
    True
    """

    def __init__(
        self,
        *,
        feature: np.ndarray,
        threshold: np.ndarray,
        left: np.ndarray,
        right: np.ndarray,
        missing_left: np.ndarray,
        leaf_value: np.ndarray,
        roots: np.ndarray,
        n_features: int,
        denominator: float,
    ) -> None:
        self.feature = np.asarray(feature, dtype=np.int64)
        self.threshold = np.asarray(threshold, dtype=np.float64)
        self.left = np.asarray(left, dtype=np.int64)
        self.right = np.asarray(right, dtype=np.int64)
        self.missing_left = np.asarray(missing_left, dtype=bool)
        self.leaf_value = np.asarray(leaf_value, dtype=np.float64)
        self.roots = np.asarray(roots, dtype=np.int64)
        self.n_features = int(n_features)
        self.denominator = float(denominator)
        self._validate()
        self._build()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_sklearn(cls, forest: Any) -> CompactForest:
        """Flatten a fitted ``IsolationForest``.

        Parameters
        ----------
        forest
            A fitted ``sklearn.ensemble.IsolationForest``.

        Returns
        -------
        CompactForest
            An evaluator whose ``score_samples`` equals ``forest.score_samples``.
        """
        if not hasattr(forest, "estimators_"):
            raise ValueError("the IsolationForest is not fitted")
        parts: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAY_FIELDS}
        roots = []
        offset = 0
        for estimator, columns in zip(forest.estimators_, forest.estimators_features_, strict=True):
            tree = estimator.tree_
            children_left = np.asarray(tree.children_left, dtype=np.int64)
            children_right = np.asarray(tree.children_right, dtype=np.int64)
            is_leaf = children_left == -1
            depths = _node_depths(children_left, children_right)
            # Same expression and order as sklearn: depth + c(n) - 1.0 (depth is int64 there).
            values = depths.astype(np.float64) + average_path_length(tree.n_node_samples) - 1.0
            columns = np.asarray(columns, dtype=np.int64)
            local_feature = np.asarray(tree.feature, dtype=np.int64)
            parts["feature"].append(
                np.where(is_leaf, -1, columns[np.where(is_leaf, 0, local_feature)])
            )
            parts["threshold"].append(
                np.where(is_leaf, 0.0, np.asarray(tree.threshold, dtype=np.float64))
            )
            parts["left"].append(np.where(is_leaf, -1, children_left + offset))
            parts["right"].append(np.where(is_leaf, -1, children_right + offset))
            parts["missing_left"].append(np.asarray(tree.missing_go_to_left, dtype=bool) & ~is_leaf)
            parts["leaf_value"].append(np.where(is_leaf, values, 0.0))
            roots.append(offset)
            offset += len(children_left)
        max_samples = int(getattr(forest, "_max_samples", forest.max_samples_))
        denominator = len(forest.estimators_) * float(average_path_length([max_samples])[0])
        return cls(
            **{name: np.concatenate(arrays) for name, arrays in parts.items()},
            roots=np.asarray(roots, dtype=np.int64),
            n_features=int(forest.n_features_in_),
            denominator=denominator,
        )

    def _validate(self) -> None:
        n = len(self.feature)
        for name in _ARRAY_FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"CompactForest: array {name!r} has the wrong length")
        if len(self.roots) == 0:
            raise ValueError("CompactForest: a forest needs at least one tree")
        internal = self.feature >= 0
        if np.any(self.feature >= self.n_features):
            raise ValueError("CompactForest: a node tests a column beyond n_features")
        children = np.concatenate([self.left[internal], self.right[internal]])
        if np.any((children < 0) | (children >= n)):
            raise ValueError("CompactForest: a child index is out of range")

    def _build(self) -> None:
        """Precompute the per-tree depth, the Python lists and the compiled scorer."""
        self.max_depth = self._max_depth()
        self._feature_list: list[int] = self.feature.tolist()
        self._threshold_list: list[float] = self.threshold.tolist()
        self._left_list: list[int] = self.left.tolist()
        self._right_list: list[int] = self.right.tolist()
        self._missing_list: list[bool] = self.missing_left.tolist()
        self._leaf_list: list[float] = self.leaf_value.tolist()
        self._root_list: list[int] = self.roots.tolist()
        if self.max_depth <= _MAX_CODEGEN_DEPTH:
            self._depth_sum: Callable[[Sequence[float]], float] = self._compile()
        else:  # pragma: no cover - only for absurdly deep trees
            self._depth_sum = self._depth_sum_loop

    def _max_depth(self) -> int:
        deepest = 0
        for root in self.roots.tolist():
            stack = [(root, 0)]
            while stack:
                node, depth = stack.pop()
                if self.feature[node] < 0:
                    deepest = max(deepest, depth)
                else:
                    stack.append((int(self.left[node]), depth + 1))
                    stack.append((int(self.right[node]), depth + 1))
        return deepest

    def _compile(self) -> Callable[[Sequence[float]], float]:
        """Generate and compile one function holding every tree as nested ``if`` blocks.

        Locals ``x0 .. x{d-1}`` hold the float32-rounded inputs. A node whose NaN goes left is
        written as ``if x > t: <right> else: <left>``: for any number this is the same test, and
        a NaN (for which every comparison is false) takes the ``else`` branch, as in sklearn.
        """
        feature, threshold = self._feature_list, self._threshold_list
        left, right, missing, leaf = (
            self._left_list,
            self._right_list,
            self._missing_list,
            self._leaf_list,
        )
        names = [f"x{i}" for i in range(self.n_features)]
        lines = ["def _depth_sum(x):"]
        if self.n_features == 1:
            lines.append("    (x0,) = _as_float32('f', x)")
        else:
            lines.append(f"    {', '.join(names)} = _as_float32('f', x)")
        lines.append("    s = 0.0")

        def emit(node: int, indent: str) -> None:
            stack: list[tuple[int, str, str | None]] = [(node, indent, None)]
            while stack:
                current, pad, prefix = stack.pop()
                if prefix is not None:
                    lines.append(prefix)
                f = feature[current]
                if f < 0:
                    lines.append(f"{pad}s += {leaf[current]!r}")
                    continue
                inner = pad + " "
                if missing[current]:
                    lines.append(f"{pad}if x{f} > {threshold[current]!r}:")
                    first, second = right[current], left[current]
                else:
                    lines.append(f"{pad}if x{f} <= {threshold[current]!r}:")
                    first, second = left[current], right[current]
                # Emit `first` then "else:" then `second`; the stack is LIFO.
                stack.append((second, inner, f"{pad}else:"))
                stack.append((first, inner, None))

        for root in self._root_list:
            emit(root, "    ")
        lines.append("    return s")
        source = "\n".join(lines)
        namespace: dict[str, Any] = {"_as_float32": array}
        exec(compile(source, "<keywatch.compact_forest>", "exec"), namespace)
        return namespace["_depth_sum"]

    def _depth_sum_loop(self, x: Sequence[float]) -> float:
        """Reference traversal over the Python lists (used for very deep trees and in tests)."""
        values = array("f", x).tolist()
        feature, threshold = self._feature_list, self._threshold_list
        left, right, missing, leaf = (
            self._left_list,
            self._right_list,
            self._missing_list,
            self._leaf_list,
        )
        total = 0.0
        for node in self._root_list:
            f = feature[node]
            while f >= 0:
                v = values[f]
                if v != v:  # NaN
                    node = left[node] if missing[node] else right[node]
                else:
                    node = left[node] if v <= threshold[node] else right[node]
                f = feature[node]
            total += leaf[node]
        return total

    # ------------------------------------------------------------------ scoring

    @property
    def n_trees(self) -> int:
        """Number of trees in the forest."""
        return len(self.roots)

    def score_samples_one(self, x: Sequence[float]) -> float:
        """Score one row exactly like ``IsolationForest.score_samples`` (lower = more abnormal).

        Parameters
        ----------
        x
            The row: a sequence of ``n_features`` numbers in the fitted column order.

        Returns
        -------
        float
            ``-2 ** (-mean_path_length / c(max_samples))``, in ``[-1, 0)``.
        """
        if len(x) != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {len(x)}")
        depth = self._depth_sum(x)
        if self.denominator == 0.0:
            return -1.0
        return -(2.0 ** (-(depth / self.denominator)))

    def anomaly_score_one(self, x: Sequence[float]) -> float:
        """The paper's anomaly score ``s(x) = 2 ** (-E[h(x)] / c(n))``: higher = more anomalous.

        This is keywatch's sign convention (in ``(0, 1]``; ~0.5 and below is ordinary,
        close to 1 is isolated at once). It is exactly ``-score_samples_one(x)``.
        """
        return -self.score_samples_one(x)

    def score_samples(self, X: np.ndarray, *, chunk_rows: int = 2048) -> np.ndarray:
        """Vectorised ``score_samples`` for a batch (same values and sign as sklearn).

        All trees are walked at once, level by level, on a ``(rows, trees)`` array of node
        indices; leaves point to themselves so finished paths stay put.

        Parameters
        ----------
        X
            Array of shape ``(n_rows, n_features)`` in the fitted column order.
        chunk_rows
            Rows per chunk, bounding the temporary ``(rows, trees)`` arrays.

        Returns
        -------
        numpy.ndarray
            Shape ``(n_rows,)``, lower = more abnormal.
        """
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected an array of shape (n, {self.n_features}), got {X.shape}")
        internal = self.feature >= 0
        nodes = np.arange(len(self.feature))
        feature = np.where(internal, self.feature, 0)
        left = np.where(internal, self.left, nodes)
        right = np.where(internal, self.right, nodes)
        out = np.empty(X.shape[0], dtype=np.float64)
        for start in range(0, X.shape[0], chunk_rows):
            block = X[start : start + chunk_rows]
            rows = np.arange(block.shape[0])[:, None]
            node = np.broadcast_to(self.roots, (block.shape[0], len(self.roots))).copy()
            for _ in range(self.max_depth):
                value = block[rows, feature[node]]
                go_left = value <= self.threshold[node]
                nan = np.isnan(value)
                if nan.any():
                    go_left = np.where(nan, self.missing_left[node], go_left)
                node = np.where(go_left, left[node], right[node])
            contributions = self.leaf_value[node]
            depths = np.zeros(block.shape[0], dtype=np.float64)
            for t in range(contributions.shape[1]):  # tree by tree, as sklearn accumulates
                depths += contributions[:, t]
            out[start : start + block.shape[0]] = depths
        if self.denominator == 0.0:
            return -np.ones_like(out)
        return -(2.0 ** (-(out / self.denominator)))

    # ------------------------------------------------------------------ pickling

    _STATE_FIELDS = (
        "feature",
        "threshold",
        "left",
        "right",
        "missing_left",
        "leaf_value",
        "roots",
        "n_features",
        "denominator",
    )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle only the arrays; the compiled function is rebuilt on load."""
        return {name: getattr(self, name) for name in self._STATE_FIELDS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"CompactForest(n_trees={self.n_trees}, n_nodes={len(self.feature)}, "
            f"n_features={self.n_features}, max_depth={self.max_depth})"
        )


def _node_depths(children_left: np.ndarray, children_right: np.ndarray) -> np.ndarray:
    """Depth of every node with the root at depth 1 (sklearn's ``compute_node_depths``)."""
    depths = np.zeros(len(children_left), dtype=np.int64)
    depths[0] = 1
    # sklearn numbers nodes depth-first, so a parent always precedes its children.
    pairs = zip(children_left.tolist(), children_right.tolist(), strict=True)
    for node, (lc, rc) in enumerate(pairs):
        if lc != -1:
            depths[lc] = depths[node] + 1
            depths[rc] = depths[node] + 1
    return depths
