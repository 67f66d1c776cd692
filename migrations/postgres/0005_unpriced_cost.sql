-- cost_nanousd may be null: a call on an unpriced route (a price no page publishes) is
-- recorded with its tokens and no cost, and reports show it as unpriced rather than $0.

alter table usage alter column cost_nanousd drop not null;
