"""`distillery datasets|models|webhooks …`: the tenant's uploads and webhook endpoints."""

from __future__ import annotations

import json

import click

from distillery.cli_support import InputError, connect, guard, print_table, upload_progress
from distillery_contract.webhooks import DEFAULT_EVENTS, WebhookEvent


def _quiet_option(fn):
    return click.option("-q", "--quiet", is_flag=True, help="print only the id")(fn)


def _paging(fn):
    fn = click.option("--after", default=None, help="the last id of the previous page")(fn)
    return click.option("--limit", default=20, show_default=True, type=int)(fn)


@click.group()
def datasets() -> None:
    """Upload, list and delete datasets."""


@datasets.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@_quiet_option
@guard
def datasets_upload(path: str, as_json: bool, quiet: bool) -> None:
    """Upload a .npz or an ImageFolder .zip/.tar.gz; prints its id."""
    from distillery.output import emit_json

    with connect() as client, upload_progress(path) as progress:
        ds = client.upload_dataset(path, on_progress=progress)
    if as_json:
        emit_json(ds.model_dump(mode="json"))
    elif quiet:
        click.echo(ds.id)
    else:
        click.echo(
            f"{ds.id}  {ds.num_samples} samples, {ds.num_classes} classes, input {ds.input_shape}"
        )


@datasets.command("list")
@_paging
@click.option("--json", "as_json", is_flag=True)
@guard
def datasets_list(limit: int, after: str | None, as_json: bool) -> None:
    """The tenant's datasets, newest first."""
    from distillery.output import emit_json, fmt_bytes

    with connect() as client:
        page = client.datasets(limit=limit, after=after)
    if as_json:
        emit_json(page.model_dump(mode="json"))
        return
    print_table(
        ("id", "file", "kind", "samples", "classes", "size", "created"),
        [
            [
                d.id,
                d.filename,
                d.kind,
                str(d.num_samples),
                str(d.num_classes),
                fmt_bytes(d.bytes),
                f"{d.created_at:%Y-%m-%d %H:%M:%S}",
            ]
            for d in page.data
        ],
    )


@datasets.command("delete")
@click.argument("dataset_id")
@guard
def datasets_delete(dataset_id: str) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    with connect() as client:
        client.delete_dataset(dataset_id)
    click.echo(f"deleted {dataset_id}")


@click.group()
def models() -> None:
    """Upload, list and delete teacher models."""


@models.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--format", "fmt", type=click.Choice(["torchscript", "onnx", "safetensors"]), default=None
)
@click.option("--arch", default=None, help="safetensors: the registered architecture")
@click.option("--arch-kwargs", default=None, help="safetensors: JSON object of arch arguments")
@click.option("--input-shape", default=None, help="C,H,W or D, checked against a job's dataset")
@click.option("--num-classes", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@_quiet_option
@guard
def models_upload(path, fmt, arch, arch_kwargs, input_shape, num_classes, as_json, quiet) -> None:
    """Upload a teacher (TorchScript, ONNX, or safetensors + --arch); prints its id."""
    from distillery.output import emit_json

    try:
        shape = [int(v) for v in input_shape.split(",")] if input_shape else None
    except ValueError:
        raise InputError(
            f"--input-shape: expected integers like 3,32,32, got {input_shape!r}"
        ) from None
    try:
        kwargs = json.loads(arch_kwargs) if arch_kwargs else None
    except json.JSONDecodeError as e:
        raise InputError(f"--arch-kwargs: not valid JSON ({e})") from None
    with connect() as client, upload_progress(path) as progress:
        m = client.upload_model(
            path,
            format=fmt,
            arch=arch,
            arch_kwargs=kwargs,
            input_shape=shape,
            num_classes=num_classes,
            on_progress=progress,
        )
    if as_json:
        emit_json(m.model_dump(mode="json"))
    elif quiet:
        click.echo(m.id)
    else:
        click.echo(
            f"{m.id}  {m.format}"
            + (f" {m.arch}" if m.arch else "")
            + (f", input {m.input_shape}" if m.input_shape else "")
            + (f", {m.num_classes} classes" if m.num_classes else "")
        )


@models.command("list")
@_paging
@click.option("--json", "as_json", is_flag=True)
@guard
def models_list(limit: int, after: str | None, as_json: bool) -> None:
    """The tenant's uploaded teachers, newest first."""
    from distillery.output import emit_json, fmt_bytes

    with connect() as client:
        page = client.models(limit=limit, after=after)
    if as_json:
        emit_json(page.model_dump(mode="json"))
        return
    print_table(
        ("id", "file", "format", "arch", "size", "created"),
        [
            [
                m.id,
                m.filename,
                m.format,
                m.arch or "",
                fmt_bytes(m.bytes),
                f"{m.created_at:%Y-%m-%d %H:%M:%S}",
            ]
            for m in page.data
        ],
    )


@models.command("delete")
@click.argument("model_id")
@guard
def models_delete(model_id: str) -> None:
    """Delete an uploaded teacher (refused while a queued or running job uses it)."""
    with connect() as client:
        client.delete_model(model_id)
    click.echo(f"deleted {model_id}")


@click.group()
def webhooks() -> None:
    """Endpoints told when the tenant's jobs end (signed per Standard Webhooks)."""


@webhooks.command("create")
@click.argument("url")
@click.option(
    "--event",
    "events",
    multiple=True,
    type=click.Choice([e.value for e in WebhookEvent]),
    help=f"repeatable; default: {', '.join(DEFAULT_EVENTS)}",
)
@click.option("--description", default="")
@click.option("--json", "as_json", is_flag=True)
@guard
def webhooks_create(url: str, events: tuple[str, ...], description: str, as_json: bool) -> None:
    """Register URL; prints its id and its signing secret (shown this once)."""
    from distillery.output import emit_json

    with connect() as client:
        hook = client.create_webhook(url, events=list(events) or None, description=description)
    if as_json:
        emit_json(hook.model_dump(mode="json"))
    else:
        click.echo(f"{hook.id}  {hook.url}  {', '.join(hook.events)}")
        click.echo(f"secret {hook.secret}  (shown once: keep it with the receiver)")


@webhooks.command("list")
@click.option("--json", "as_json", is_flag=True)
@guard
def webhooks_list(as_json: bool) -> None:
    from distillery.output import emit_json

    with connect() as client:
        hooks = client.webhooks()
    if as_json:
        emit_json({"data": [h.model_dump(mode="json") for h in hooks]})
        return
    print_table(
        ("id", "url", "events", "created"),
        [[h.id, h.url, ", ".join(h.events), f"{h.created_at:%Y-%m-%d %H:%M:%S}"] for h in hooks],
    )


@webhooks.command("delete")
@click.argument("webhook_id")
@guard
def webhooks_delete(webhook_id: str) -> None:
    with connect() as client:
        client.delete_webhook(webhook_id)
    click.echo(f"deleted {webhook_id}")


@webhooks.command("secret")
@guard
def webhooks_secret() -> None:
    """Print the secret that signs the webhooks jobs name in their spec."""
    with connect() as client:
        click.echo(client.webhook_secret())


@webhooks.command("deliveries")
@click.argument("webhook_id", required=False)
@click.option("--job", "job_id", default=None, help="every delivery about this job instead")
@_paging
@click.option("--json", "as_json", is_flag=True)
@guard
def webhooks_deliveries(
    webhook_id: str | None, job_id: str | None, limit: int, after: str | None, as_json: bool
) -> None:
    """Deliveries to WEBHOOK_ID (or about --job JOB), newest first, with every attempt."""
    from distillery.output import emit_json

    if (webhook_id is None) == (job_id is None):
        raise InputError("name a WEBHOOK_ID or --job JOB_ID (one of them)")
    with connect() as client:
        page = client.deliveries(webhook_id=webhook_id, job_id=job_id, limit=limit, after=after)
    if as_json:
        emit_json(page.model_dump(mode="json"))
        return
    print_table(
        ("id", "event", "job", "status", "attempts"),
        [
            [
                d.id,
                d.event,
                d.job_id,
                d.status,
                " ".join(str(a.status_code or a.error) for a in d.attempts),
            ]
            for d in page.data
        ],
    )
