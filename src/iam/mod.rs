//! AWS IAM database authentication: credentials, the RDS token signer and the token cache.
