"""The SDK's public surface is exactly `__all__`, every member documented (like httpx's export test)."""

from __future__ import annotations

import inspect

import nhi_broker_client
import nhi_broker_client.fastapi as sdk_fastapi
import nhi_broker_client.mcp as sdk_mcp
import nhi_broker_client.pydantic_ai as sdk_pydantic_ai


def test_all_names_exist_are_public_and_documented() -> None:
    for module in (nhi_broker_client, sdk_fastapi, sdk_mcp, sdk_pydantic_ai):
        assert sorted(module.__all__) == list(module.__all__) or module is sdk_fastapi
        for name in module.__all__:
            member = getattr(module, name)
            assert not name.startswith("_") or name == "__version__"
            if inspect.isclass(member) or inspect.isfunction(member):
                assert member.__doc__ and member.__doc__.strip(), name
                assert member.__module__.startswith("nhi_broker_client"), name


def test_nothing_public_outside_all() -> None:
    public = {n for n in dir(nhi_broker_client) if not n.startswith("_")}
    modules = {n for n in public if inspect.ismodule(getattr(nhi_broker_client, n))}
    assert public - modules == set(nhi_broker_client.__all__) - {"__version__"}


def test_the_sdk_does_not_import_the_broker() -> None:
    import pathlib

    root = pathlib.Path(nhi_broker_client.__file__).parent
    for source in root.glob("*.py"):
        text = source.read_text()
        assert "import broker" not in text and "from broker" not in text, source.name
