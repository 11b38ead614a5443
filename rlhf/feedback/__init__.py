"""Human feedback: the labeling web app (store, server, pages), consensus and agreement, scripted labelers.

Python entry points other stages use:

* ``rlhf.feedback.store.open_store(path)`` — the campaign database;
* ``rlhf.feedback.campaign.import_campaign(...)`` — completions file → campaign;
* ``rlhf.feedback.server.start_in_thread(store)`` — a server on a free port, for scripts and tests;
* ``rlhf.feedback.simulate.simulate_labelers(url, admin_token, scorer, n, noise, seed)``;
* ``rlhf.feedback.export.label_records / consensus_records`` — the rankings contract.
"""
