"""``blockvault policy``: the authorization defaults as a sample policy file, like
``oslopolicy-sample-generator --format yaml`` prints Cinder's (docs/policy.md)."""

from __future__ import annotations

import click


@click.command("policy")
@click.option("--output-file", type=click.Path(dir_okay=False), default=None,
              help="Write the sample here instead of standard output.")
def policy_command(output_file: str | None) -> None:
    """Print every policy rule blockvault enforces, with its default, as a commented-out
    policy.yaml: uncomment and change the lines to override (the file is re-read when it
    changes, no restart)."""
    from blockvault.service.policy import sample_yaml

    text = sample_yaml()
    if output_file:
        with open(output_file, "w") as f:
            f.write(text)
    else:
        click.echo(text, nl=False)
