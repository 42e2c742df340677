"""Build entry point. The compiled extension ``metagpt_fast._C`` (csrc/) is added here by the extension build."""

from setuptools import setup

setup()
