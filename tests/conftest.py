import signal

import pytest

from tests.tiny_models import FAMILIES, make_model, make_tokenizer


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_raises_keyboard_interrupt():
    """SIGINT raises KeyboardInterrupt in every test, as in a terminal. A suite started in the background by a shell
    without job control (`pytest &` in a script, `nohup`) inherits SIGINT ignored, and Python then installs no
    handler: the tests that send themselves a Ctrl-C would see nothing happen and fail."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_model(family):
    return make_model(family)
