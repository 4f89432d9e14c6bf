// The tables both backends share; see migrations/{sqlite,postgres}.

diesel::table! {
    apps (id) {
        id -> BigInt,
        platform -> Text,
        app_id -> Text,
        credentials -> Nullable<Text>,
        created_at -> BigInt,
    }
}

diesel::table! {
    devices (id) {
        id -> BigInt,
        sip_user_id -> BigInt,
        platform -> Text,
        token -> Text,
        app_id -> Text,
        name -> Nullable<Text>,
        os_version -> Nullable<Text>,
        client_version -> Nullable<Text>,
        remote_logging_id -> Nullable<Text>,
        sandbox -> Bool,
        alert_token -> Nullable<Text>,
        expires_at -> Nullable<BigInt>,
        created_at -> BigInt,
        updated_at -> BigInt,
        last_seen_at -> BigInt,
        proxy_expires_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    response_log (id) {
        id -> BigInt,
        platform -> Text,
        roundtrip -> Double,
        available -> Bool,
        created_at -> BigInt,
    }
}

diesel::table! {
    hangup_reasons (id) {
        id -> BigInt,
        sip_user_id -> BigInt,
        unique_key -> Text,
        reason -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    call_history (id) {
        id -> BigInt,
        created_at -> BigInt,
        sip_user_id -> BigInt,
        unique_key -> Text,
        devices -> Text,
        outcome -> Text,
        waited_ms -> BigInt,
        answered_by -> Nullable<Integer>,
        roundtrip_ms -> Nullable<BigInt>,
    }
}
