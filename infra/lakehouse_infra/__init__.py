"""The AWS CDK app that deploys the lakehouse: see infra/app.py and the README's deploy section."""
