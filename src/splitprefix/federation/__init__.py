"""Several data parties on Flower: the ClientApp (one data party), the ServerApp and the FedAvg math."""

from splitprefix.federation.aggregate import weighted_average

__all__ = ["weighted_average"]
