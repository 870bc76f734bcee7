//! Sending one notification: a webhook signed per the Standard Webhooks convention, or
//! an email through the SMTP relay.
//!
//! A webhook is a JSON `POST` with three headers: `webhook-id` (the same on every retry
//! of one delivery), `webhook-timestamp` (seconds since the epoch) and
//! `webhook-signature`, `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`
//! under the destination's secret (`whsec_` and the base64 key). Any 2xx answer is a
//! delivery; anything else, or no answer within the timeout, is a failure to retry.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit as _, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;

use super::service::{AlertOptions, Notification, severity_name};

/// A delivery the receiver took.
#[derive(Debug)]
pub(super) struct Sent {
    /// Its HTTP status (none for email).
    pub(super) status: Option<u16>,
}

/// A failed attempt.
#[derive(Debug)]
pub(super) struct Failed {
    /// The receiver's HTTP status, if it answered.
    pub(super) status: Option<u16>,
    /// What went wrong.
    pub(super) message: String,
}

fn failed(status: Option<u16>, message: impl Into<String>) -> Failed {
    Failed {
        status,
        message: message.into(),
    }
}

/// A new random signing secret.
pub fn new_secret() -> String {
    let key: [u8; 24] = rand::random();
    format!("whsec_{}", BASE64.encode(key))
}

/// The key bytes of a `whsec_…` secret.
pub(super) fn secret_key(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = BASE64
        .decode(encoded)
        .map_err(|e| format!("the secret is not base64 after 'whsec_': {e}"))?;
    if key.len() < 16 {
        return Err("the secret must hold at least 16 bytes".into());
    }
    Ok(key)
}

/// The `webhook-signature` header value for one message.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Result<String, String> {
    let key = secret_key(secret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body.as_bytes());
    Ok(format!("v1,{}", BASE64.encode(mac.finalize().into_bytes())))
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The JSON body of a notification.
pub(super) fn payload(n: &Notification, predicate: &str) -> String {
    json!({
        "type": format!("alert.{}", <&str>::from(n.state)),
        "timestamp": iso(n.created_at),
        "data": {
            "notification_id": n.id,
            "alert": n.alert,
            "view": n.view,
            "predicate": predicate,
            "state": <&str>::from(n.state),
            "severity": severity_name(n.severity),
            "key": n.key,
            "row": n.row,
            "since": iso(n.since),
            "at": iso(n.at),
        }
    })
    .to_string()
}

/// An email subject for a notification.
pub(super) fn subject(n: &Notification) -> String {
    format!(
        "[{}] {} {} for {}",
        severity_name(n.severity).to_uppercase(),
        n.alert,
        <&str>::from(n.state),
        key_text(&n.key)
    )
}

fn key_text(key: &Value) -> String {
    match key {
        Value::Object(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        Value::Object(_) => "the view".into(),
        other => other.to_string(),
    }
}

/// Posts a signed body to `url`.
pub(super) async fn post(
    http: &reqwest::Client,
    url: &str,
    secret: Option<&str>,
    id: &str,
    body: &str,
) -> Result<Sent, Failed> {
    let timestamp = chrono::Utc::now().timestamp();
    let mut request = http
        .post(url)
        .header("content-type", "application/json")
        .header("user-agent", concat!("quiver/", env!("CARGO_PKG_VERSION")))
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(secret) = secret {
        let signature = sign(secret, id, timestamp, body).map_err(|e| failed(None, e))?;
        request = request.header("webhook-signature", signature);
    }
    let response = request.body(body.to_owned()).send().await.map_err(|e| {
        let what = if e.is_timeout() {
            "no answer within the delivery timeout"
        } else if e.is_connect() {
            "cannot connect"
        } else {
            "request failed"
        };
        failed(None, format!("{what}: {e}"))
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(Sent {
            status: Some(status.as_u16()),
        });
    }
    let text = response.text().await.unwrap_or_default();
    let text: String = text.chars().take(200).collect();
    Err(failed(
        Some(status.as_u16()),
        format!("the receiver answered {status}: {text}"),
    ))
}

/// Sends a notification by email through the configured relay.
pub(super) async fn email(
    options: &AlertOptions,
    to: &str,
    subject: &str,
    body: &str,
) -> Result<Sent, Failed> {
    let Some(relay) = &options.smtp_url else {
        return Err(failed(
            None,
            "no SMTP relay is configured (start the server with --smtp-url)",
        ));
    };
    let data: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let data = &data["data"];
    let text = format!(
        "Alert {alert} is {state} ({severity}) for {key}.\n\nView: {view}\nCondition: {predicate}\nSince: {since}\nAt: {at}\n\nRow:\n{row}\n",
        alert = data["alert"].as_str().unwrap_or(""),
        state = data["state"].as_str().unwrap_or(""),
        severity = data["severity"].as_str().unwrap_or(""),
        key = key_text(&data["key"]),
        view = data["view"].as_str().unwrap_or(""),
        predicate = data["predicate"].as_str().unwrap_or(""),
        since = data["since"].as_str().unwrap_or(""),
        at = data["at"].as_str().unwrap_or(""),
        row = serde_json::to_string_pretty(&data["row"]).unwrap_or_default(),
    );
    let html = format!(
        "<html><body><h2>{}</h2><p>View <code>{}</code>, condition <code>{}</code>, since {}.</p><pre>{}</pre></body></html>",
        crate::mail::escape_html(subject),
        crate::mail::escape_html(data["view"].as_str().unwrap_or("")),
        crate::mail::escape_html(data["predicate"].as_str().unwrap_or("")),
        crate::mail::escape_html(data["since"].as_str().unwrap_or("")),
        crate::mail::escape_html(&serde_json::to_string_pretty(&data["row"]).unwrap_or_default()),
    );
    crate::mail::send(
        relay,
        options.delivery_timeout,
        crate::mail::Email {
            from: options.email_from.clone(),
            to: vec![to.to_owned()],
            subject: subject.to_owned(),
            text,
            html,
            attachment: None,
        },
    )
    .await
    .map(|()| Sent { status: None })
    .map_err(|e| failed(None, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example in the Standard Webhooks specification.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn short_or_garbled_secrets_are_refused() {
        assert!(
            secret_key("whsec_c2hvcnQ=")
                .unwrap_err()
                .contains("16 bytes")
        );
        assert!(secret_key("whsec_!!!").unwrap_err().contains("base64"));
        assert!(secret_key(&new_secret()).is_ok());
    }
}
