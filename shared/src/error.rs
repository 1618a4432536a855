//! The one table of error codes shared by HTTP and WebSocket.
//!
//! Every error a client can see carries one of these codes. The code is stable (clients
//! branch on it); the message is for people and says what to do.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Missing, malformed, expired or forged token.
    Unauthenticated,
    /// A capability or tenant check failed.
    Forbidden,
    /// Unknown file, query or subscription.
    NotFound,
    /// Input fails the schema; the details name the field.
    InvalidArgument,
    /// Over the size limit; the message says the limit.
    FileTooLarge,
    /// The tenant's storage quota is reached.
    QuotaExceeded,
    /// Upload ticket expired, reused, or its signature is wrong.
    UploadUrlExpired,
    /// Too many requests; comes with a retry delay.
    RateLimited,
    /// A function or job ran past its limit.
    Timeout,
    /// A dependency is down; the message says which.
    Unavailable,
    /// A bug on our side. Never used for bad input.
    Internal,
}

impl ErrorCode {
    /// Every code, in table order.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::InvalidArgument,
        ErrorCode::FileTooLarge,
        ErrorCode::QuotaExceeded,
        ErrorCode::UploadUrlExpired,
        ErrorCode::RateLimited,
        ErrorCode::Timeout,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    /// The HTTP status that goes with the code. `invalid_argument` is 400 here; routes that
    /// received well-formed but semantically wrong input may answer 422 instead.
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthenticated => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::InvalidArgument => 400,
            ErrorCode::FileTooLarge => 413,
            ErrorCode::QuotaExceeded => 507,
            ErrorCode::UploadUrlExpired => 403,
            ErrorCode::RateLimited => 429,
            ErrorCode::Timeout => 504,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// The code as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::FileTooLarge => "file_too_large",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::UploadUrlExpired => "upload_url_expired",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error body, identical over HTTP (as the JSON body) and WebSocket (inside an
/// `error` frame).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// What went wrong and what to do, for people.
    pub message: String,
    /// Structured details, for example `{"field": "args.tenant"}` or `{"limit_bytes": 20971520}`.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

impl ErrorBody {
    /// An error without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            details: serde_json::Value::Null,
        }
    }

    /// Adds structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_wire_names() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
        }
    }

    #[test]
    fn statuses_follow_the_design_table() {
        assert_eq!(ErrorCode::Unauthenticated.http_status(), 401);
        assert_eq!(ErrorCode::Forbidden.http_status(), 403);
        assert_eq!(ErrorCode::NotFound.http_status(), 404);
        assert_eq!(ErrorCode::InvalidArgument.http_status(), 400);
        assert_eq!(ErrorCode::FileTooLarge.http_status(), 413);
        assert_eq!(ErrorCode::QuotaExceeded.http_status(), 507);
        assert_eq!(ErrorCode::UploadUrlExpired.http_status(), 403);
        assert_eq!(ErrorCode::RateLimited.http_status(), 429);
        assert_eq!(ErrorCode::Timeout.http_status(), 504);
        assert_eq!(ErrorCode::Unavailable.http_status(), 503);
    }

    #[test]
    fn body_omits_null_details() {
        let body = ErrorBody::new(ErrorCode::NotFound, "no such file");
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"code":"not_found","message":"no such file"}"#
        );
    }
}
