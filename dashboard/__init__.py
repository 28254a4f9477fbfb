"""The Streamlit dashboard: ``streamlit run dashboard/app.py``. Pages in ``views/``, shared reads in ``state``, figures in ``charts``."""
