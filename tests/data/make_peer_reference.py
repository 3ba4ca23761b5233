"""Regenerates tests/data/peer_reference_aggregators.json: the peers' own outputs on fixed inputs.

Run ONCE (the JSON is committed; the tests never need torch or the peers):

    # a CPU torch beside numpy and scipy, in a throw-away venv (not jbyz's environment)
    python3.11 -m venv /tmp/peerref-venv
    /tmp/peerref-venv/bin/pip install "torch==2.13.0+cpu" numpy scipy scikit-learn  # CPU torch
    # the peers' sources at the commits below (git clone + git checkout, or `git archive`)
    git clone https://github.com/LPD-EPFL/byzfl /tmp/peers/byzfl
    git -C /tmp/peers/byzfl checkout 69bd1ac0116fa7ff9eaf6d8ae049650d8e5f7e55
    git clone https://github.com/fedlib/fedlib /tmp/peers/fedlib
    git -C /tmp/peers/fedlib checkout 8428019621bef6abc1a23c1c4363823221559a4e
    git clone https://github.com/lishenghui/blades /tmp/peers/blades
    git -C /tmp/peers/blades checkout v0.1.0
    /tmp/peerref-venv/bin/python tests/data/make_peer_reference.py \
        --byzfl /tmp/peers/byzfl --fedlib /tmp/peers/fedlib --blades /tmp/peers/blades

Peers and what is taken from them (only the files named are imported, nothing is copied):

* ByzFL, LPD-EPFL/byzfl at 69bd1ac0116fa7ff9eaf6d8ae049650d8e5f7e55 (2025-06-06):
  ``byzfl/aggregators/aggregators.py`` ``MoNNA(f, idx)`` on numpy float64 inputs. (ByzFL's CAF and
  SMEA draw a random power-method start, so they are checked against exact numpy versions in
  the test instead.)
* fedlib, fedlib/fedlib at 8428019621bef6abc1a23c1c4363823221559a4e (2025-10-25), Blades' engine:
  ``fedlib/aggregators/aggregators.py`` ``DnC(num_byzantine, sub_dim, num_iters, filter_frac)``
  with ``sub_dim >= d`` (every iteration then uses all coordinates, so the output does not depend
  on torch's random permutation).
* fedlib (same commit): ``fedlib/aggregators/signguard.py`` ``Signguard()``. Its
  ``fedlib.utils.torch_utils`` import pulls in ray, so only the function it calls,
  ``clip_tensor_norm_``, is taken from ``fedlib/utils/torch_utils.py`` (its source, unchanged, by
  ``ast``). SignGuard's 2-means is scikit-learn's ``KMeans(random_state=0)`` (scikit-learn is
  needed in the venv); the cases have well separated sign statistics.
* fedlib (same commit): ``fedlib/aggregators/clippedclustering.py`` ``Clippedclustering()``
  (scikit-learn's ``AgglomerativeClustering``), stateful: each case is a sequence of steps on one
  instance (``xs``, ``outs``), so the norm history is exercised.
* Blades, lishenghui/blades at tag v0.1.0 (a7238f20ece562d24772421a7e57f9b792c9b8eb):
  ``src/blades/aggregators/fltrust.py`` ``Fltrust()``; its ``blades.client`` import is replaced by
  a stand-in (only ``is_trusted()`` and ``get_update()`` are called). The trusted client's update
  is jbyz's ``reference``.

Inputs are float32 numbers (stored exactly), so jbyz's float32 kernels see the same values.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pathlib
import sys
import types

import numpy as np

PEERS = {
    "byzfl": "LPD-EPFL/byzfl@69bd1ac0116fa7ff9eaf6d8ae049650d8e5f7e55",
    "fedlib": "fedlib/fedlib@8428019621bef6abc1a23c1c4363823221559a4e",
    "blades": "lishenghui/blades@v0.1.0 (a7238f20ece562d24772421a7e57f9b792c9b8eb)",
}
OUT = pathlib.Path(__file__).with_name("peer_reference_aggregators.json")


def load_file(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def sample(seed: int, n: int, d: int, outliers: int = 0, scale: float = 20.0) -> np.ndarray:
    """Gaussian rows, the first ``outliers`` of them moved far along one direction (as jbyz's
    Byzantine slots), rounded to float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if outliers:
        direction = rng.normal(size=d)
        x[:outliers] = x[:outliers] * 0.3 + scale * direction / np.linalg.norm(direction)
    return x.astype(np.float32).astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--byzfl", type=pathlib.Path, required=True, help="ByzFL source checkout")
    ap.add_argument("--fedlib", type=pathlib.Path, required=True, help="fedlib source checkout")
    ap.add_argument("--blades", type=pathlib.Path, required=True, help="Blades v0.1.0 checkout")
    args = ap.parse_args()

    import torch

    torch.manual_seed(0)
    cases = []

    # ByzFL: a namespace package, so that importing byzfl.aggregators does not run byzfl/__init__
    # (which imports the whole benchmark stack).
    pkg = types.ModuleType("byzfl")
    pkg.__path__ = [str(args.byzfl / "byzfl")]
    sys.modules["byzfl"] = pkg
    bf = importlib.import_module("byzfl.aggregators.aggregators")
    for seed, n, d, f, idx, outliers in [
        (1, 7, 5, 2, 0, 2),
        (2, 7, 5, 2, 3, 2),
        (3, 10, 20, 3, 6, 3),
        (4, 10, 20, 3, 9, 0),
        (5, 5, 3, 0, 2, 0),
        (6, 11, 4, 5, 10, 5),
    ]:
        x = sample(seed, n, d, outliers)
        out = bf.MoNNA(f=f, idx=idx)(x.copy())
        cases.append(dict(rule="monna", peer="byzfl", call=f"MoNNA(f={f}, idx={idx})",
                          params={"idx": idx}, f=f, x=x.tolist(), out=np.asarray(out).tolist()))

    # fedlib DnC (file imports only numpy and torch).
    fl = load_file("fedlib_aggregators", args.fedlib / "fedlib" / "aggregators" / "aggregators.py")
    for seed, n, d, f, frac, iters, outliers in [
        (11, 10, 30, 2, 1.0, 5, 2),
        (12, 12, 50, 3, 1.0, 1, 3),
        (13, 9, 16, 4, 0.5, 5, 4),
        (14, 8, 16, 0, 1.0, 5, 0),
        (15, 11, 40, 3, 1.0, 5, 1),
    ]:
        x = sample(seed, n, d, outliers, scale=5.0)
        agg = fl.DnC(f, sub_dim=10000, num_iters=iters, filter_frac=frac)
        out = agg([torch.tensor(r, dtype=torch.float32) for r in x]).double().numpy()
        cases.append(dict(rule="dnc", peer="fedlib",
                          call=f"DnC({f}, sub_dim=10000, num_iters={iters}, filter_frac={frac})",
                          params={"iters": iters, "filter_frac": frac}, f=f, x=x.tolist(),
                          out=out.tolist()))

    # fedlib SignGuard: fedlib.aggregators as a bare package (its __init__ imports every rule),
    # fedlib.utils.torch_utils reduced to the one function SignGuard calls.
    import ast

    root = args.fedlib / "fedlib"
    for name, path in [("fedlib", root), ("fedlib.aggregators", root / "aggregators")]:
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
    src = (root / "utils" / "torch_utils.py").read_text()
    fn = next(n for n in ast.parse(src).body
              if isinstance(n, ast.FunctionDef) and n.name == "clip_tensor_norm_")
    tu = types.ModuleType("fedlib.utils.torch_utils")
    tu.__dict__.update(torch=torch, inf=torch.inf, _tensor_or_tensors=object)
    exec(compile(ast.Module([fn], []), str(root / "utils" / "torch_utils.py"), "exec"), tu.__dict__)
    utils = types.ModuleType("fedlib.utils")
    utils.__path__ = []
    utils.torch_utils = tu
    sys.modules["fedlib.utils"] = utils
    sys.modules["fedlib.utils.torch_utils"] = tu
    sg = importlib.import_module("fedlib.aggregators.signguard")
    for seed, n, d, flip, tiny, huge, zeros in [
        (31, 10, 60, 3, 0, 0, 0),
        (32, 11, 40, 2, 1, 1, 0),
        (33, 9, 30, 0, 1, 2, 5),
        (34, 12, 80, 5, 0, 1, 10),
    ]:
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, d)) + 1.0
        x[:flip] = -x[:flip]
        x[flip:flip + tiny] *= 0.01  # below 0.1 x the median norm
        x[flip + tiny:flip + tiny + huge] *= 50.0  # clipped
        if zeros:
            x[:, :zeros] = 0.0
        x = x.astype(np.float32).astype(np.float64)
        out = sg.Signguard()([torch.tensor(r, dtype=torch.float32) for r in x]).double().numpy()
        cases.append(dict(rule="signguard", peer="fedlib", call="Signguard()", params={}, f=0,
                          x=x.tolist(), out=out.tolist()))

    cc = importlib.import_module("fedlib.aggregators.clippedclustering")
    for seed, n, d, flip, huge, steps, linkage in [
        (41, 10, 30, 3, 1, 3, "average"),
        (42, 11, 20, 4, 2, 2, "average"),
        (43, 9, 25, 2, 0, 3, "single"),
    ]:
        rng = np.random.default_rng(seed)
        agg = cc.Clippedclustering(linkage=linkage)
        xs, outs = [], []
        for t in range(steps):
            x = (rng.normal(size=(n, d)) + 1.0) * rng.uniform(0.5, 2.0)
            x[:flip] = -x[:flip]
            x[flip:flip + huge] *= 30.0
            x = x.astype(np.float32).astype(np.float64)
            out = agg([torch.tensor(r, dtype=torch.float32) for r in x]).double().numpy()
            xs.append(x.tolist())
            outs.append(out.tolist())
        cases.append(dict(rule="clipped_clustering", peer="fedlib",
                          call=f"Clippedclustering(linkage={linkage!r}), {steps} steps",
                          params={"linkage": linkage}, f=0, xs=xs, outs=outs))

    # Blades v0.1.0 FLTrust, with a stand-in for blades.client.
    blades_pkg = types.ModuleType("blades")
    blades_pkg.__path__ = []
    client_mod = types.ModuleType("blades.client")

    class BladesClient:  # the two methods Fltrust calls
        def __init__(self, update, trusted=False):
            self._update, self._trusted = update, trusted

        def is_trusted(self):
            return self._trusted

        def get_update(self):
            return self._update

    client_mod.BladesClient = BladesClient
    sys.modules["blades"] = blades_pkg
    sys.modules["blades.client"] = client_mod
    bl = load_file("blades_fltrust", args.blades / "src" / "blades" / "aggregators" / "fltrust.py")
    for seed, n, d, flip in [(21, 8, 6, 2), (22, 10, 12, 4), (23, 5, 3, 0)]:
        rng = np.random.default_rng(seed)
        ref = rng.normal(size=d).astype(np.float32).astype(np.float64)
        x = (ref + rng.normal(size=(n, d)) * 0.8) * rng.uniform(0.2, 5.0, size=(n, 1))
        x[:flip] = -x[:flip]  # negative cosine: trust 0
        x = x.astype(np.float32).astype(np.float64)
        clients = [BladesClient(torch.tensor(ref, dtype=torch.float32), trusted=True)]
        clients += [BladesClient(torch.tensor(r, dtype=torch.float32)) for r in x]
        out = bl.Fltrust()(clients).double().numpy()
        cases.append(dict(rule="fltrust", peer="blades", call="Fltrust()", params={}, f=0,
                          x=x.tolist(), reference=ref.tolist(), out=out.tolist()))

    import sklearn

    OUT.write_text(json.dumps({"peers": PEERS, "torch": torch.__version__,
                               "numpy": np.__version__, "scikit-learn": sklearn.__version__,
                               "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
