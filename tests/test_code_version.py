"""Which source files a training job runs: the code whose change re-runs it (decoupled/code_version.py)."""

from decoupled import code_version
from decoupled.grid import method_names


def names(method):
    return {p.relative_to(code_version.ROOT).as_posix() for p in code_version.training_files(method)}


def test_a_job_runs_the_shared_training_code_and_its_own_methods_files_only():
    shared = {"cli.py", "train.py", "job.py", "resume.py", "model.py", "data/__init__.py", "data/prepared.py", "data/fashion_mnist.py", "data/cifar10.py", "optim.py", "eager.py", "numerics.py", "evaluate.py", "tracking.py", "engines/simulated.py",
              "engines/simulated_async.py", "engines/distributed.py", "engines/boundary.py", "quantize.py", "methods/__init__.py", "methods/base.py"}
    own = {"backprop": {"backprop"}, "dgl": {"dgl"}, "dni": {"dni"}, "cdni": {"cdni", "dni"}, "ddg": {"ddg"}, "fdg": {"fdg", "ddg"}, "gn_dgl": {"gn_dgl", "dgl"}}
    assert set(method_names()) == set(own)
    for method, files in own.items():
        found = names(method)
        assert shared <= found, shared - found
        assert {p for p in found if p.startswith("methods/")} - {"methods/__init__.py", "methods/base.py"} == {f"methods/{f}.py" for f in files}
        assert not any(p.startswith("report/") for p in found) and "layout.py" not in found  # the report's code re-runs the report alone


def test_the_hash_names_what_changed():
    assert code_version.training_code_hash("fdg").startswith("shared code ") and ", ddg+fdg " in code_version.training_code_hash("fdg")
    assert code_version.training_code_hash("dgl").split(",")[0] == code_version.training_code_hash("fdg").split(",")[0]
