# Reporting rules (paper_tables target) are owned by the reporting helper; this placeholder is replaced by it.
