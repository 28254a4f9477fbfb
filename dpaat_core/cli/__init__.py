"""``python -m dpaat_core``'s commands, one module each, and the detached launch the Train page uses."""
