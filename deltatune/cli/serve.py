"""`deltatune serve`: the OpenAI-compatible server. Engine options, the port and the address are checked
before the model loads (the port is bound first), so each of their errors is one line and exit 2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltatune.cli import command, fail, key_values, keys_help, with_keys_help


def _engine_options_help(args: list[str]) -> str:
    from deltatune.serve.options import ServeOptions

    return keys_help("Engine options (-o key=value, repeatable)", ServeOptions, flags=False)


def _engine_options(items: list[str]) -> dict[str, object]:
    from pydantic import ValidationError

    from deltatune.serve.options import ServeOptions

    values = key_values(items, "--option")
    for key in sorted(values.keys() - ServeOptions.model_fields.keys()):
        fail(f"--option {key}: unknown engine option; valid: {', '.join(ServeOptions.model_fields)}")
    try:
        return ServeOptions(**values).model_dump(exclude_unset=True)
    except ValidationError as err:
        first = err.errors()[0]
        fail(f"--option {first['loc'][0]}: {first['msg']} (got {first['input']!r})")


def _pair(item: str, flag: str, form: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq or not key or not value:
        fail(f"{flag} expects {form}, got {item!r}")
    return key, value


@command(cls=with_keys_help(_engine_options_help))
def serve(
    base: Annotated[str, typer.Option(help="'default', a HF directory or a .gguf file")] = "default",
    adapter: Annotated[list[str], typer.Option(help="name=path, repeatable")] = [],  # noqa: B006
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="DELTATUNE_API_KEY", help="required Bearer key")
    ] = None,
    allow_adapter_dir: Annotated[list[Path], typer.Option(help="dirs POST /v1/adapters may load from")] = [],  # noqa: B006
    router: Annotated[
        list[str],
        typer.Option(help="NAME=ADAPTER1,ADAPTER2,...: a served name that picks one adapter per request"),
    ] = [],  # noqa: B006
    router_examples: Annotated[
        list[str],
        typer.Option(
            help="ADAPTER=FILE or ADAPTER=task:NAME: example prompts of its skill (none: Arrow's prototypes)"
        ),
    ] = [],  # noqa: B006
    option: Annotated[
        list[str], typer.Option("--option", "-o", help="engine option key=value (listed below)")
    ] = [],  # noqa: B006
) -> None:
    """OpenAI-compatible server for the base model and many adapters at once."""
    from deltatune.serve.app import serve as run

    if not 0 <= port <= 65535:
        fail(f"--port {port}: not a TCP port (0-65535)")
    adapters = {
        name: Path(path) for name, path in (_pair(item, "--adapter", "name=path") for item in adapter)
    }
    options = _engine_options(option)
    examples = dict(_pair(item, "--router-examples", "ADAPTER=FILE") for item in router_examples)
    routers = {}
    for item in router:
        name, members = _pair(item, "--router", "NAME=ADAPTER1,ADAPTER2")
        missing = [a for a in members.split(",") if a not in examples]
        if missing and len(missing) < len(members.split(",")):  # none: Arrow's prototypes, no data
            fail(
                f"--router {name}: adapter {missing[0]!r} needs example prompts: --router-examples {missing[0]}=FILE"
            )
        routers[name] = {a: examples.get(a) for a in members.split(",")}
    run(
        base,
        adapters,
        host=host,
        port=port,
        api_key=api_key,
        allowed_adapter_dirs=allow_adapter_dir,
        routers=routers,
        **options,
    )
