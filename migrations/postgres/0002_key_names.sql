-- Key names are unique among active keys only: a rotated key (the old one revoked, a new
-- one created under the same name) keeps the service under one name in usage reports.

alter table api_keys drop constraint api_keys_name_key;

create unique index api_keys_active_name on api_keys (name) where revoked_at is null;
