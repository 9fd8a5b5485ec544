"""Packages and their folders (everything else is in setup.cfg).

callbacks/, datamodules/ and experiments/ stay at the repository's top level, the layout users
know, and install as provq_lightning.callbacks / .datamodules / .experiments, so they never
collide with PyPI's ``callbacks`` or a user's own modules. The folders are mapped, not linked:
one file, one module name. The configs ship as package data of provq_lightning.experiments, so
``provq-fit --config topodisc_provq`` finds them outside a checkout.
"""

from setuptools import find_packages, setup

MAPPED = {"callbacks": "callbacks", "datamodules": "datamodules", "experiments": "experiments"}

packages = find_packages(include=["provq_lightning", "provq_lightning.*"])
package_dir = {}
for name, folder in MAPPED.items():
    for sub in ["", *("." + p for p in find_packages(where=folder))]:
        packages.append(f"provq_lightning.{name}{sub}")
    package_dir[f"provq_lightning.{name}"] = folder

setup(packages=packages, package_dir=package_dir)
