"""Reading a study back: text tables, the HTML report, the dashboard."""
