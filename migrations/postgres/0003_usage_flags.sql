-- usage_suspect: a provider reported more than 100 million tokens for one call; the counts
-- were capped at that and the row is flagged for a person to look at.
-- cost_estimated: the cost is imagegate's worst-case estimate, not a price of reported usage
-- (a call cut off by a crash: outcome 'interrupted').
-- token counts may be null: an interrupted call has no reported usage, and 0 would read as
-- "the provider said zero".

alter table usage add column usage_suspect boolean not null default false;
alter table usage add column cost_estimated boolean not null default false;

alter table usage alter column text_input_tokens drop not null;
alter table usage alter column image_input_tokens drop not null;
alter table usage alter column cached_text_input_tokens drop not null;
alter table usage alter column cached_image_input_tokens drop not null;
alter table usage alter column input_tokens drop not null;
alter table usage alter column output_tokens drop not null;
alter table usage alter column total_tokens drop not null;
