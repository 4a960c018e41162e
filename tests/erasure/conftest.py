"""Shared fixtures: a tiny random-initialised test-bed model exported in the diffusers layout
(the `smoke` architecture of configs/t2i/testbed.py), loaded as an erasure `Pipeline`."""

import pytest


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    from configs.t2i import testbed as testbed_config
    from experiments import t2i_testbed as tb
    from jaxsafe.data import shapes
    from jaxsafe.train import split_model

    c = testbed_config.get_config("smoke")
    graphdef, params, frozen = split_model(tb.build_model(c, shapes.tokenizer(c.data.max_length)))
    folder = str(tmp_path_factory.mktemp("tiny_testbed"))
    tb.export(c, graphdef, params, frozen, folder)
    return folder


@pytest.fixture
def tiny_pipe(tiny_folder):
    from jaxsafe.diffusion import pipeline

    return pipeline.load(tiny_folder)
