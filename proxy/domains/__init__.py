"""Custom-domain verification (CONTRACT §12): ``domains add`` rules, the checks, the verifier."""
