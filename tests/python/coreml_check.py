"""Loads an .mlpackage with coremltools (PyPI) on Linux and rebuilds its MIL program.

Usage: coreml_check.py PACKAGE_DIR
Prints one JSON line: specification version, function names, op counts by type, inputs,
outputs and states as coremltools sees them. Exits non-zero (with the error) when
coremltools refuses the package or the program does not type-check.
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")


def main(path):
    import logging

    logging.disable(logging.WARNING)
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto_load

    # coremltools rewrites Manifest.json when it opens a package: check a copy, so the
    # bundle's files stay as signed.
    import os
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp()
    copy = os.path.join(tmp, "model.mlpackage")
    shutil.copytree(path, copy)
    model = ct.models.MLModel(copy, skip_model_load=True)
    spec = model.get_spec()
    weights_dir = model.weights_dir
    prog = milproto_load.load(spec, spec.specificationVersion, weights_dir)
    ops = {}
    for fname, func in prog.functions.items():
        for op in func.operations:
            ops[op.op_type] = ops.get(op.op_type, 0) + 1
    desc = spec.description
    print(json.dumps({
        "specification_version": spec.specificationVersion,
        "functions": sorted(prog.functions.keys()),
        "ops": ops,
        "inputs": [i.name for i in desc.input],
        "outputs": [o.name for o in desc.output],
        "states": [s.name for s in desc.state],
    }))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main(sys.argv[1])
