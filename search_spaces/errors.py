"""The error of a space rule or policy that does not fit the model."""


class SpaceError(ValueError):
    """A space rule or policy that does not fit the model: the message says what to fix."""
