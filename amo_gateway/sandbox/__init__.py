"""An in-project stand-in for amoCRM's OAuth and API, faithful to the upstream rules the gateway must obey."""

from amo_gateway.sandbox.app import SANDBOX_STATE, create_sandbox_app
from amo_gateway.sandbox.config import SandboxAccount, SandboxConfig
from amo_gateway.sandbox.resolver import LoopbackResolver
from amo_gateway.sandbox.state import SandboxState

__all__ = ["SANDBOX_STATE", "LoopbackResolver", "SandboxAccount", "SandboxConfig", "SandboxState", "create_sandbox_app"]
