"""The root of every error whose message is written for the user.

It lives on the models side of the seam because models/ raises such errors too (a config, weights
or parallel layout that cannot work) and never imports pipeline/; `pipeline.errors` re-exports it
(through `models.interface`, the seam) beside the pipeline's own (`UsageError`, `one_line`, the
exit codes). Catch `UserError` to tell a user's mistake (exit 2, a 4xx, a row's one-line reason)
from a bug.
"""


class UserError(ValueError):
    """An error whose message is written for the user as it stands.

    `show_type`: whether `pipeline.errors.one_line` names the class before the message
    ("ConfigError: no model named x"); off for errors whose text reads whole on its own.
    """

    show_type = False
