"""The evaluation layer: metrics, the data classifier, a chain's samples and scores, the chain diagnostic, figures, nearest neighbours."""
