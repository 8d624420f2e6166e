"""sam3pipe library: video-clip fine-tuning of the pinned sam3 detector. No KFP imports here."""
