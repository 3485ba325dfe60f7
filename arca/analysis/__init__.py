"""Analysis over finished runs: concentration, faithfulness, statistics, tables, figures (tables in, tables out)."""
