"""`stm download`: fetch, verify and prepare the data sources (stage download@<source>)."""
