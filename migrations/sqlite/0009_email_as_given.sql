-- The user's email as the app (or Stripe) wrote it, when that differs from the normalised
-- `email`: Stripe's list filter is case-sensitive, so resolve asks for both spellings.
ALTER TABLE users ADD COLUMN email_as_given TEXT;
