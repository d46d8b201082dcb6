"""The only package that starts processes or touches files outside the data dir (/proc/sys)."""
