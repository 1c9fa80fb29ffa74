"""The orchestration (top-level flows/ and tasks/, the product's layout) installs as
modelpress.flows and modelpress.tasks, not as generic top-level packages; pyproject.toml holds
everything else. (A package mapped from another folder needs this list: pyproject's package
discovery does not follow package-dir.)"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["modelpress", "modelpress.*"]) + ["modelpress.flows", "modelpress.tasks"],
    package_dir={"modelpress.flows": "flows", "modelpress.tasks": "tasks"},
)
