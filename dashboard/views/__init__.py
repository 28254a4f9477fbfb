"""One module per dashboard page (not ``pages/``: Streamlit would serve that folder on its own)."""
