"""`ts.utils`: helpers handlers use (`ts.utils.util`)."""
