//! Whether the agent reads a process's HTTPS plaintext (the `state` label of
//! `tls_decryption_processes`): the decryption budget's states.

/// How a process that calls TLS is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecryptionState {
    /// Its libssl calls are read (uprobes): HTTP figures from the plaintext.
    Decrypted,
    /// Over the decryption budget: counted from its ciphertext until its estimated cost
    /// stays low enough.
    CiphertextBudget,
    /// Its TLS library cannot be read (no OpenSSL with its symbols): counted from ciphertext.
    CiphertextUnsupported,
    /// Left out by `--tls.never-decrypt`: counted from ciphertext.
    CiphertextOptOut,
}

impl DecryptionState {
    pub const ALL: [Self; 4] = [
        Self::Decrypted,
        Self::CiphertextBudget,
        Self::CiphertextUnsupported,
        Self::CiphertextOptOut,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Decrypted => "decrypted",
            Self::CiphertextBudget => "ciphertext_budget",
            Self::CiphertextUnsupported => "ciphertext_unsupported",
            Self::CiphertextOptOut => "ciphertext_opt_out",
        }
    }
}
