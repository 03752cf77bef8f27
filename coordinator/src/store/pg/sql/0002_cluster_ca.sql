-- The cluster CA, shared by every coordinator on this database (one row),
-- so that certificates issued by any of them are valid on all. `key` is
-- the CA's private key (PKCS#8 PEM): sealed with ChaCha20-Poly1305 under
-- the operator's key (--ca-seal-key-file) when `sealed`, else as is.
CREATE TABLE cluster_ca (
    id smallint PRIMARY KEY CHECK (id = 1),
    cert_pem text NOT NULL,
    key bytea NOT NULL,
    sealed boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
